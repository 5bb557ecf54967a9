"""
The ``selfheal.django.tenants`` backend: django-tenants with healing connections.

    DATABASES = {"default": {"ENGINE": "selfheal.django.tenants", ...}}

Schema per tenant needs nothing more: a collision names the schema of the
table it happened in (the tenant's), and selfheal heals that table, whatever
the connection's search_path says.
"""
