"""ACME (RFC 8555) on the gateway: directory, accounts, orders, challenges, finalize, ARI, profiles."""
