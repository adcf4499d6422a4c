"""
C{listen.workers: N}: one supervisor process and N worker processes serving one listening socket
(L{mcpgw.fleet.supervisor}, L{mcpgw.fleet.worker}, L{mcpgw.fleet.channel}). See docs/scaling.md.
"""
