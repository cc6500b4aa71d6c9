"""appliance/console"""
