"""A strict local stand-in for the parts of Stripe's API portal-gateway uses.

Test and development tooling only (never in the production image, and it must
not import ``service``): the service's tests and ``make run`` point
``STRIPE_API_BASE`` at it instead of api.stripe.com. It validates
``POST /v1/billing_portal/sessions`` as strictly as Stripe (API version
2025-09-30.clover), serves ``GET /v1/subscriptions``, ``GET /v1/customers`` and
``GET /v1/customers/{id}`` from seeded data, implements the portal
configuration endpoints (``/v1/billing_portal/configurations``: create, update,
retrieve, list), scopes every object to the connected account it was seeded or
made on (the ``Stripe-Account`` header, Connect), records every request, and
injects faults on demand through ``/_standin/...``. Portal session URLs point
at billing.stripe.com unless ``session_url_base`` says otherwise; the stand-in
serves the page of each session it created at ``/p/session/{id}``.

Run it with ``python -m stripe_standin`` or build it in-process with
:func:`create_app`; ``app[STATE]`` is the :class:`StandinState` behind both.

Where things are:

* ``app``: :func:`create_app`, the URL table, the ``Request-Id`` middleware;
* ``stripe_api``: what every ``/v1`` request goes through (auth, version,
  form, idempotency, recording, faults, errors);
* ``stripe_endpoints``: what each ``/v1`` endpoint answers; ``listing``: the
  pagination every list endpoint shares;
* ``configuration_endpoints`` (the portal configuration endpoints),
  ``configuration_params`` (their parameters), ``configurations`` (the object:
  defaults, update merging, what a session may do with it, Dashboard edits);
  ``catalogue``: the seeded products and prices configurations may name;
* ``validation``: Stripe's parameter rules; ``stripe_errors``: Stripe's other
  error messages;
* ``faults`` (parsing a scripted fault) and ``fault_responses`` (acting it out);
* ``state``: :class:`StandinState`, recordings, seeded subscriptions and
  customers, the account each seeded object lives on; ``customers``: how a
  customer seed becomes a Stripe customer object;
* ``control`` and ``control_input``: the ``/_standin`` control API and its input
  checks; ``responses``: JSON and request-id helpers both faces use;
* ``portal_page``: the page a session URL opens when it points at the stand-in.
"""

from .app import create_app
from .control_input import ControlError
from .faults import Fault
from .state import (
    DEFAULT_API_KEY_PREFIXES,
    DEFAULT_SESSION_URL_BASE,
    REDACTED,
    STATE,
    RecordedRequest,
    StandinState,
)
from .stripe_api import DEFAULT_API_VERSION, mask_api_key
from .stripe_endpoints import DEFAULT_CONFIGURATION
from .validation import LOCALES, StripeError, decode_form

DEFAULT_PORT = 12111  # stripe-mock's port, so either can serve the same configuration

__all__ = [
    "DEFAULT_API_KEY_PREFIXES",
    "DEFAULT_API_VERSION",
    "DEFAULT_CONFIGURATION",
    "DEFAULT_PORT",
    "DEFAULT_SESSION_URL_BASE",
    "LOCALES",
    "REDACTED",
    "STATE",
    "ControlError",
    "Fault",
    "RecordedRequest",
    "StandinState",
    "StripeError",
    "create_app",
    "decode_form",
    "mask_api_key",
]
