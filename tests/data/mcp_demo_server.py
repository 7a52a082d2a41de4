"""A tiny stdio MCP server for the tests of the agent's MCP tools: `python tests/data/mcp_demo_server.py`."""

try:                                         # mcp 2.x
    from mcp.server.mcpserver import MCPServer
except ImportError:                          # mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer

server = MCPServer("demo")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def read_file(path: str) -> str:
    """A name the built-in tools already use: glm5 must prefix it with the server's name."""
    return f"demo server read {path}"


@server.tool()
def fail(message: str) -> str:
    """Always raises: the error must come back as a failed tool result."""
    raise ValueError(message)


if __name__ == "__main__":
    server.run()
