"""appliance/factory"""
