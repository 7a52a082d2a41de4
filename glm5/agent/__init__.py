"""glm5 Agent Mode: a tool-calling agent that delivers files, its OS sandbox and its tools.

The agent talks to a model only over an OpenAI-compatible HTTP API; nothing here imports the model, the
engine or torch. `glm5.agent.sandbox` runs untrusted code; `glm5.agent.tools` holds the tools the model
calls (python, shell, files, sql, chart, export, search/open, MCP).
"""
