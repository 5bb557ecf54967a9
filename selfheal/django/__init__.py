"""
Django: healing connections through one setting.

    DATABASES = {"default": {"ENGINE": "selfheal.django", ...}}

``selfheal.django`` is a database backend: Django's own PostgreSQL backend
(psycopg 3) whose connections are `selfheal.HealingConnection`, so every
statement Django runs (ORM, ``connection.cursor()``, migrations, ``loaddata``)
heals a lagging sequence and is retried once, in autocommit and inside
``transaction.atomic()`` alike. For django-tenants use
``"selfheal.django.tenants"`` instead. Options go in
``OPTIONS["selfheal"]`` (the fields of `selfheal.HealOptions`).

Adding ``"selfheal.django"`` to ``INSTALLED_APPS`` as well provides the
``selfheal_check`` and ``selfheal_fix`` management commands.
"""
