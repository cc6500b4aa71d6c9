"""appliance/ocsp"""
