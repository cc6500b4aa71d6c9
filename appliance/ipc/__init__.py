"""appliance/ipc"""
