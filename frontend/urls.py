from django.contrib.auth import views as auth_views
from django.urls import path

from frontend import views

app_name = "frontend"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="frontend/login.html",
                                                redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("organizations/switch/", views.organization_switch, name="organization-switch"),
    path("adapters/", views.adapters, name="adapters"),
    path("adapters/<str:id>/deploy", views.adapter_deploy_view, name="adapter-deploy"),
    path("adapters/<str:id>/undeploy", views.adapter_undeploy_view, name="adapter-undeploy"),
    path("playground/", views.playground, name="playground"),
    path("", views.home, name="home"),
]
