"""The dashboard's htmx function views, one module per area. They call the platform's selectors
and services, exactly as the REST API does: the same scopes, the same errors, the same audit."""
