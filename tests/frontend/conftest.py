"""Helpers for the dashboard's server-side tests: signed-in browsers with CSRF enforced."""

from __future__ import annotations

from django.test import Client


def browser(user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf(client: Client) -> dict:
    """The header a page's htmx (or fetch) sends: the CSRF cookie's token."""
    if "csrftoken" not in client.cookies:
        client.get("/")
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def form(client: Client, data: dict) -> dict:
    """A plain form post's token field."""
    return {**data, "csrfmiddlewaretoken": csrf(client)["HTTP_X_CSRFTOKEN"]}
