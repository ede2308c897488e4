"""taxonedge.convert"""
