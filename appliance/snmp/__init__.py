"""appliance/snmp"""
