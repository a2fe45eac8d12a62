"""portal-gateway: opens Stripe customer-portal sessions for our users."""
