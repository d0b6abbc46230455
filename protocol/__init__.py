"""fedlora.protocol"""
