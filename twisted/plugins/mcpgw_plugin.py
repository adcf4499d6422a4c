"""twistd plugin drop-in: C{twistd -n mcpgw --config FILE}. Everything lives in L{mcpgw.tap}."""

from twisted.application.service import ServiceMaker

mcpgw = ServiceMaker("mcpgw", "mcpgw.tap", "Model Context Protocol gateway", "mcpgw")
