from django import forms

from vms.models import Image, Template, name_validator


class VmCreateForm(forms.Form):
    name = forms.CharField(
        max_length=63, validators=[name_validator], help_text="Lowercase letters, digits and dashes."
    )
    template = forms.ModelChoiceField(queryset=Template.objects.none(), to_field_name="name", empty_label=None)
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
