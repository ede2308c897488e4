"""taxonedge.edge"""
