"""appliance/distribution"""
