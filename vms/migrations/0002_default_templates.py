from django.db import migrations


def create_defaults(apps, schema_editor):
    Image = apps.get_model("vms", "Image")
    Template = apps.get_model("vms", "Template")
    image, _ = Image.objects.get_or_create(name="linux-default", defaults={"status": "building"})
    Template.objects.get_or_create(
        name="linux-default",
        defaults=dict(
            description="Debian 12 minimal with Python 3 and the guest agent",
            image=image,
            vcpus=1,
            max_vcpus=2,
            memory_mib=256,
            max_memory_mib=2048,
            disk_gib=2,
            max_disk_gib=20,
        ),
    )
    Template.objects.get_or_create(
        name="linux-small",
        defaults=dict(
            description="Smallest Linux sandbox",
            image=image,
            vcpus=1,
            max_vcpus=1,
            memory_mib=128,
            max_memory_mib=512,
            disk_gib=1,
            max_disk_gib=4,
        ),
    )


class Migration(migrations.Migration):
    dependencies = [("vms", "0001_initial")]
    operations = [migrations.RunPython(create_defaults, migrations.RunPython.noop)]
