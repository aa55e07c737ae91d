import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("vms", "0016_inventory"),
    ]

    operations = [
        migrations.AddField(
            model_name="vm",
            name="move_target",
            field=models.ForeignKey(
                blank=True,
                editable=False,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="vms_incoming",
                to="vms.host",
            ),
        ),
    ]
