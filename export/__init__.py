"""fedlora.export"""
