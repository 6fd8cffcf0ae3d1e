"""medseg.inferers"""
