"""One view, run in a transaction per request (ATOMIC_REQUESTS)."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from .models import AuditEntry, Order


@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    item = request.POST.get("item", "book")
    # Written first: a heal of the orders table below must not lose it.
    AuditEntry.objects.create(message=f"order placed for {item}")
    order = Order.objects.create(item=item)
    return JsonResponse({"id": order.id})
