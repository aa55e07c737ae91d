from django import forms
from django.contrib.auth.forms import AuthenticationForm

from accounts import services


class LoginForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "locked": "Too many failed logins: sign-in is locked for a while. Try again in %(seconds)s seconds.",
    }

    def clean(self):
        from accounts.backends import client_address

        username = self.cleaned_data.get("username")
        refusal = username and services.login_refusal(username=username, address=client_address(self.request))
        if refusal:
            services.login_blocked(username=username, message=refusal.message)
            raise forms.ValidationError(
                self.error_messages["locked"], code="locked", params={"seconds": refusal.retry_after}
            )
        return super().clean()


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100)
    read_only = forms.BooleanField(required=False)
    expires_at = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
