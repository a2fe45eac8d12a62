"""The Stripe form body the client sends is what ``urlencode`` makes of Stripe's pairs."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from hypothesis import given
from hypothesis import strategies as st

from service.stripe.encode import encode_form, form_body

text = st.text(max_size=30)
params = st.dictionaries(
    st.text(min_size=1, max_size=12),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        text,
        st.dictionaries(st.text(min_size=1, max_size=8), text, max_size=3),
        st.lists(st.dictionaries(st.text(min_size=1, max_size=8), text, max_size=2), max_size=3),
    ),
    max_size=6,
)


@given(params)
def test_the_body_is_urlencode_of_the_pairs_and_reads_back(value: dict[str, object]) -> None:
    pairs = encode_form(value)
    body = form_body(pairs)
    assert body == urlencode(pairs, doseq=True).encode()
    assert parse_qsl(body.decode(), keep_blank_values=True) == pairs


def test_nested_params_as_stripe_reads_them() -> None:
    body = form_body(
        encode_form(
            {
                "customer": "cus_1",
                "return_url": "https://app.example.com/a?b=c&d",
                "flow_data": {"type": "x", "items": [{"id": "si_1", "quantity": 2}]},
                "locale": None,
            }
        )
    )
    assert body == (
        b"customer=cus_1&return_url=https%3A%2F%2Fapp.example.com%2Fa%3Fb%3Dc%26d"
        b"&flow_data%5Btype%5D=x&flow_data%5Bitems%5D%5B0%5D%5Bid%5D=si_1"
        b"&flow_data%5Bitems%5D%5B0%5D%5Bquantity%5D=2"
    )
