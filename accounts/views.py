from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from accounts import selectors, services
from accounts.forms import LoginForm, TokenForm
from sandbox_site.errors import ApplicationError


class LoginView(auth_views.LoginView):
    template_name = "accounts/login.html"
    authentication_form = LoginForm
    redirect_authenticated_user = True

    def form_valid(self, form):
        response = super().form_valid(form)
        services.session_login_recorded(user=form.get_user())
        return response


@login_required
def token_list(request):
    form = TokenForm(request.POST or None)
    new_secret = None
    if request.method == "POST" and form.is_valid():
        expires_at = form.cleaned_data["expires_at"]
        if expires_at is not None and timezone.is_naive(expires_at):
            expires_at = timezone.make_aware(expires_at)
        try:
            _, new_secret = services.token_create(
                user=request.user,
                name=form.cleaned_data["name"],
                read_only=form.cleaned_data["read_only"],
                expires_at=expires_at,
                actor=request.user,
            )
        except ApplicationError as exc:
            form.add_error(None, exc.message)
        else:
            form = TokenForm()
    tokens = selectors.token_list_for(request.user)
    return render(request, "accounts/tokens.html", {"form": form, "tokens": tokens, "new_secret": new_secret})


@login_required
@require_POST
def token_revoke(request, token_id):
    token = get_object_or_404(selectors.token_list_for(request.user), pk=token_id)
    services.token_revoke(token=token, actor=request.user)
    messages.success(request, f"Token {token.name} revoked.")
    return redirect("token-list")
