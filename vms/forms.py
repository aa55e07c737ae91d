from django import forms

from vms.models import Image, Template, name_validator
from vms.services import template_image_refusal


class TemplateChoiceField(forms.ModelChoiceField):
    """Templates whose own image cannot boot a new VM (no disk yet, deprecated) say so in their
    label; they stay selectable because a VM may pick another image (the form's ``clean``)."""

    def label_from_instance(self, obj: Template) -> str:
        reason = template_image_refusal(obj)
        return obj.name if reason is None else f"{obj.name} — its image {reason}"


class VmCreateForm(forms.Form):
    name = forms.CharField(
        max_length=63, validators=[name_validator], help_text="Lowercase letters, digits and dashes."
    )
    template = TemplateChoiceField(queryset=Template.objects.none(), to_field_name="name", empty_label=None)
    image = forms.ModelChoiceField(
        queryset=Image.objects.none(), to_field_name="name", required=False, empty_label="The template's image"
    )
    vcpus = forms.IntegerField(min_value=1, max_value=64, required=False, label="vCPUs")
    memory_mib = forms.IntegerField(min_value=64, max_value=1024 * 1024, required=False, label="Memory (MiB)")
    disk_gib = forms.IntegerField(min_value=1, max_value=4096, required=False, label="Disk (GiB)")
    start = forms.BooleanField(required=False, initial=True, label="Start it right away")

    def __init__(self, *args, templates, images=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["template"].queryset = templates
        self.fields["image"].queryset = images if images is not None else Image.objects.none()

    def clean(self):
        data = super().clean()
        template = data.get("template")
        if template is not None and not data.get("image"):
            reason = template_image_refusal(template)
            if reason is not None:
                self.add_error(
                    "template",
                    f"Template {template.name}'s image {template.image.name} {reason}: "
                    "pick a template whose image can boot, or pick an image.",
                )
        return data
