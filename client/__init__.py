"""fedlora.client"""
