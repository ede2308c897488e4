"""taxonedge.train"""
