"""appliance/gateway"""
