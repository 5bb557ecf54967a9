"""Two ordinary models; nothing in them knows about selfheal."""

from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=100)
    quantity = models.IntegerField(default=1)


class AuditEntry(models.Model):
    message = models.CharField(max_length=200)
