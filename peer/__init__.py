"""
Peer suites: the frameworks' own test suites, run plain and through selfheal.

``make peer`` (``python -m peer.run``) runs Django's and SQLAlchemy's own tests
from their sdists twice on the same server, once on the stock psycopg
backend and once on selfheal's, and fails on any test that passes plain but
not through selfheal.
"""
