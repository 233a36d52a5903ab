"""OpenAI-style list pages: ``{"object": "list", "data": [...], "has_more": bool}``, ``?after=&limit=``."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Q, QuerySet
from rest_framework import serializers

from tuneplex.core.errors import ApiError

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class ListParams(serializers.Serializer):
    after = serializers.CharField(required=False, max_length=100,
                                  help_text="Return objects after this id (from a previous page).")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=MAX_LIMIT,
                                     default=DEFAULT_LIMIT)


class OrderedListParams(ListParams):
    order = serializers.ChoiceField(choices=["asc", "desc"], required=False,
                                    help_text="By creation time: asc (oldest first) or desc.")


def list_page(queryset: QuerySet, query_params, *, serializer_class, cursor_field: str = "pk",
              default_order: str | None = None, context: dict | None = None) -> dict:
    """One page of ``queryset``, newest first, keyed by (created_at, id) like OpenAI's lists.
    ``after`` names an object by ``cursor_field``, the field its API ``id`` shows. With
    ``default_order`` the caller may choose ``order`` (asc or desc), as OpenAI's newer lists do."""
    for name in ("limit", "order"):  # given empty, a query parameter is not "left out"
        if query_params.get(name, None) == "":
            raise ApiError(f"{name} is empty; leave it out or give a value.", code="invalid_value",
                           param=name)
    params = (OrderedListParams if default_order else ListParams)(data=query_params)
    params.is_valid(raise_exception=True)
    after, limit = params.validated_data.get("after"), params.validated_data["limit"]
    ascending = (params.validated_data.get("order") or default_order) == "asc"
    queryset = queryset.order_by(*(("created_at", "pk") if ascending else ("-created_at", "-pk")))
    if after:
        try:
            anchor = queryset.filter(**{cursor_field: after}).values("created_at", "pk").first()
        except (ValueError, DjangoValidationError):  # not even of the id's type (an integer id)
            anchor = None
        if anchor is None:
            raise ApiError(f"No object with id {after!r} in this list.", code="invalid_cursor",
                           param="after")
        if ascending:
            queryset = queryset.filter(Q(created_at__gt=anchor["created_at"])
                                       | Q(created_at=anchor["created_at"], pk__gt=anchor["pk"]))
        else:
            queryset = queryset.filter(Q(created_at__lt=anchor["created_at"])
                                       | Q(created_at=anchor["created_at"], pk__lt=anchor["pk"]))
    rows = list(queryset[: limit + 1])
    data = serializer_class(rows[:limit], many=True, context=context or {}).data
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
