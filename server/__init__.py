"""fedlora.server"""
