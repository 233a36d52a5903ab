from django.contrib.auth import views as auth_views
from django.urls import path

from frontend.views import datasets, jobs, organizations, overview, serving, signup, team
from frontend.views.organizations import organization_switch

app_name = "frontend"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="frontend/login.html",
                                                redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", signup.signup, name="signup"),
    path("organizations/switch/", organization_switch, name="organization-switch"),
    path("", overview.home, name="home"),
    path("datasets/", datasets.datasets, name="datasets"),
    path("datasets/<oid:id>/", datasets.dataset, name="dataset"),
    path("datasets/<oid:id>/statistics", datasets.dataset_statistics, name="dataset-statistics"),
    path("datasets/<oid:id>/delete", datasets.dataset_delete, name="dataset-delete"),
    path("jobs/", jobs.jobs, name="jobs"),
    path("jobs/new", jobs.job_new, name="job-new"),
    path("jobs/new/check", jobs.job_check, name="job-check"),
    path("jobs/<oid:id>/", jobs.job, name="job"),
    path("jobs/<oid:id>/progress", jobs.job_progress, name="job-progress"),
    path("jobs/<oid:id>/cancel", jobs.job_cancel, name="job-cancel"),
    path("adapters/", serving.adapters, name="adapters"),
    path("adapters/<oid:id>/deploy", serving.adapter_deploy_view, name="adapter-deploy"),
    path("adapters/<oid:id>/undeploy", serving.adapter_undeploy_view, name="adapter-undeploy"),
    path("playground/", serving.playground, name="playground"),
    path("feedback/", serving.feedback, name="feedback"),
    path("feedback/export", serving.feedback_export_view, name="feedback-export"),
    path("feedback/preference-export", serving.preference_export_view,
         name="feedback-preference-export"),
    path("team/", team.team, name="team"),
    path("team/invitations", team.invitation_create_view, name="invitation-create"),
    path("team/invitations/<oid:id>/revoke", team.invitation_revoke_view, name="invitation-revoke"),
    path("invitations/", organizations.invitations, name="invitations"),
    path("invite/<str:token>/", organizations.invitation_link, name="invitation-link"),
    path("invitations/<oid:id>/", organizations.invitation, name="invitation"),
    path("team/<oid:id>/role", team.member_role, name="member-role"),
    path("team/<oid:id>/remove", team.member_remove, name="member-remove"),
    path("api-keys/", team.api_keys, name="api-keys"),
    path("api-keys/<oid:id>/revoke", team.api_key_revoke_view, name="api-key-revoke"),
    path("audit/", team.audit_log, name="audit"),
]
