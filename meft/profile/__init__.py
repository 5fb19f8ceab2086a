"""`meft profile`: N training steps under the traffic meter (`run`), and the reports and link predictions
built from what it recorded (`report`).
"""
