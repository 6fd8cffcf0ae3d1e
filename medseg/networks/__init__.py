"""medseg.networks"""
