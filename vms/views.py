from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from vms import selectors


@login_required
def home(request):
    vms = selectors.vm_list_visible(request.user)
    return render(request, "vms/home.html", {"vms": vms})
