from django import forms
from django.contrib.auth.forms import AuthenticationForm

from accounts import services


class LoginForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "locked": "Too many failed logins: this account is locked for a while. Try again later.",
    }

    def clean(self):
        username = self.cleaned_data.get("username")
        if username and services.login_is_locked(username):
            services.login_blocked(username=username)
            raise forms.ValidationError(self.error_messages["locked"], code="locked")
        return super().clean()


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100)
    read_only = forms.BooleanField(required=False)
    expires_at = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
