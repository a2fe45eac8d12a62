"""Seeded products and prices: what portal configurations may name.

``POST /_standin/catalogue`` (and :meth:`StandinState.seed_catalogue`) take
``{"products": [{"id": "prod_…", "prices": ["price_…", …], "account": "acct_…"?}]}``:
each price belongs to the product it is listed under. Once anything is seeded,
a configuration naming an unknown product or price (or one on another account)
is ``resource_missing``, and a price listed under a product it does not belong
to is refused; until then any well-formed ``prod_``/``price_`` id passes, as
every id the stand-in was never told about does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .control_input import ControlError
from .customers import seed_account

__all__ = ["Catalogue", "ProductSeed", "product_seed"]

_PRODUCT_RE: Final = re.compile(r"prod_[A-Za-z0-9_]+")
_PRICE_RE: Final = re.compile(r"price_[A-Za-z0-9_]+")


@dataclass(frozen=True)
class ProductSeed:
    """One checked product seed: its id, its prices, the account it lives on."""

    product: str
    prices: tuple[str, ...]
    account: str | None


def product_seed(seed: object) -> ProductSeed:
    if not isinstance(seed, dict):
        raise ControlError("each product must be a JSON object")
    unknown = set(seed) - {"id", "prices", "account"}
    if unknown:
        raise ControlError(f"unknown product seed fields: {', '.join(sorted(unknown))}")
    product = seed.get("id")
    if not isinstance(product, str) or _PRODUCT_RE.fullmatch(product) is None:
        raise ControlError(f"product id must be a prod_ id, got {product!r}")
    prices = seed.get("prices", [])
    if not isinstance(prices, list) or not all(
        isinstance(price, str) and _PRICE_RE.fullmatch(price) for price in prices
    ):
        raise ControlError(f"{product}: prices must be a list of price_ ids")
    return ProductSeed(product, tuple(prices), seed_account(seed, product))


@dataclass
class Catalogue:
    """Products and their prices (which account each lives on is kept by the state)."""

    products: dict[str, list[str]] = field(default_factory=dict)
    # price id -> the product it belongs to
    prices: dict[str, str] = field(default_factory=dict)

    def add(self, seed: ProductSeed) -> None:
        """Add or replace a product; a price seeded again moves to this product."""
        for price in self.products.get(seed.product, []):
            self.prices.pop(price, None)
        for price in seed.prices:
            old = self.prices.get(price)
            if old is not None and old != seed.product:
                self.products[old].remove(price)
            self.prices[price] = seed.product
        self.products[seed.product] = list(seed.prices)

    def to_json(self, account_of: Callable[[str], str | None]) -> list[dict[str, Any]]:
        return [
            {"id": product, "prices": prices, "account": account_of(product)}
            for product, prices in self.products.items()
        ]
