"""The README walkthrough's weather agent, importable by the tests (tests/test_cli_truths.py)."""

from pydantic import BaseModel

from spine import AgentDefinition, Registry, ToolContext, tool


class City(BaseModel):
    city: str


class Forecast(BaseModel):
    forecast: str


@tool()
async def forecast(args: City, ctx: ToolContext) -> Forecast:
    """Today's weather forecast for a city."""
    return Forecast(forecast=f"Sunny in {args.city}")


def register(registry: Registry) -> None:
    registry.add_tool(forecast)
    registry.add_agent(AgentDefinition("weather-agent", "Answer weather questions.", ("forecast",)))
