"""The upstream client: everything that talks to Stripe's API.

``encode`` (nested form params), ``retry`` (pure retry rules), ``breaker``
(the per-replica circuit breaker), ``attempt`` (what one exchange produced),
``errors`` (a Stripe answer → our ``ServiceError``) and ``client`` (the one
send loop every call goes through).
"""

from service.stripe.breaker import CircuitBreaker
from service.stripe.client import CustomerPage, PortalSession, StripeClient
from service.stripe.errors import upstream_error_code

__all__ = [
    "CircuitBreaker",
    "CustomerPage",
    "PortalSession",
    "StripeClient",
    "upstream_error_code",
]
