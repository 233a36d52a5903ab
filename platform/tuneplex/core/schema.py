"""OpenAPI descriptions of our authentication schemes (loaded from CoreConfig.ready)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "tuneplex.apikeys.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer",
                "description": "An organization API key: `Authorization: Bearer tpx_…`."}


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = "tuneplex.tenancy.authentication.OrganizationSessionAuthentication"
    name = "Session"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "cookie", "name": "sessionid",
                "description": "A signed-in browser session (writes also need the CSRF token)."}
