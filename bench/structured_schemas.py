"""The JSON-schema set of the structured-output benchmark and tests: real schemas that a
package ships (the ones vendored in `check-jsonschema`: CI configs, GitHub forms, ...) and
hand-written ones covering nested objects, arrays with min/max items, enums, patterns and
formats. Each entry has a short task for the model (the schemas are far too long to put in
a 2k-token prompt: the grammar does the work). The real schemas are tightened (`tighten`) so
SmolLM2-135M ends its document within a few hundred tokens rather than filling every optional
key with run-on strings; outputs are validated against the schema as shipped."""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchemaCase:
    name: str
    schema: str  # JSON text: what the output is constrained to
    task: str
    real: bool  # shipped by a package (else written here)
    original: str = ""  # a real schema as shipped (`schema` is its tightened form); outputs are validated against it

    @property
    def validate_against(self) -> str:
        return self.original or self.schema


MAX_STRING = 24  # characters of a free string
MAX_SHAPED_STRING = 64  # of a string a format or pattern shapes (a uuid, a date-time, a URL)
MAX_ITEMS = 2


def tighten(node, level: int = 2):
    """A narrower schema a small model finishes within a few hundred tokens, removing only
    documents (every document valid under the result is valid under the original):
    strings of at most MAX_STRING characters (MAX_SHAPED_STRING with a format or pattern),
    arrays of at most max(minItems, MAX_ITEMS) items; from level 1 an object that lists its
    properties takes no other keys (a free map with no required keys is empty); at level 2 it
    keeps its required properties and at most two optional scalar ones."""
    if isinstance(node, list):
        return [tighten(x, level) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: tighten(v, level) for k, v in node.items()}
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if "string" in types and not any(k in out for k in ("enum", "const", "maxLength")):
        shaped = "format" in out or "pattern" in out
        out["maxLength"] = max(MAX_SHAPED_STRING if shaped else MAX_STRING, out.get("minLength", 0))
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(MAX_ITEMS, out.get("minItems", 0))
    props = out.get("properties")
    if level >= 1 and isinstance(props, dict) and props and all(r in props for r in out.get("required", [])):
        if level >= 2:
            required = list(out.get("required", []))
            optional = [k for k in props if k not in required and _scalar(props[k])][:2]
            out["properties"] = {k: props[k] for k in required + optional}
        out["additionalProperties"] = False
        out.pop("patternProperties", None)
    elif (level >= 1 and "object" in types and not props and not out.get("required")
          and not out.get("minProperties")):
        out["additionalProperties"] = False  # a free map: the empty one
        out.pop("patternProperties", None)
    return out


def _scalar(node) -> bool:
    """A property whose value is one bounded scalar (kept as an optional property)."""
    if not isinstance(node, dict):
        return False
    if "enum" in node or "const" in node:
        return True
    t = node.get("type")
    return t in ("string", "integer", "number", "boolean")


def _compiles(schema: dict) -> bool:
    import llguidance as llg

    for lenient in (False, True):
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"lenient": lenient})
        except ValueError:
            continue
        if not llg.LLMatcher.validate_grammar(grammar):
            return True
    return False


def tightest(schema):
    """The tightest level of `tighten` that still compiles (dropping properties can break a
    $ref into them); the schema itself if none does."""
    for level in (2, 1, 0):
        narrow = tighten(schema, level)
        if _compiles(narrow):
            return narrow
    return schema


def _s(**kw) -> dict:
    return {"additionalProperties": False, **kw}


HAND = {
    "person": ("Describe a fictional person.", _s(
        type="object", required=["name", "age", "email"],
        properties={"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "email": {"type": "string", "format": "email", "maxLength": 40}})),
    "address_nested": ("Give a shipping address.", _s(
        type="object", required=["recipient", "address"],
        properties={"recipient": {"type": "string", "maxLength": 30},
                    "address": _s(type="object", required=["street", "city", "zip", "country"],
                                  properties={"street": {"type": "string", "maxLength": 40},
                                              "city": {"type": "string", "maxLength": 25},
                                              "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                              "country": {"enum": ["FR", "DE", "IT", "ES", "US"]}})})),
    "order_items": ("List an order of 2 to 4 items.", _s(
        type="object", required=["order_id", "items"],
        properties={"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
                    "items": {"type": "array", "minItems": 2, "maxItems": 4,
                              "items": _s(type="object", required=["sku", "qty"],
                                          properties={"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                                      "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}})),
    "weather": ("Report today's weather in Paris.", _s(
        type="object", required=["city", "temp_c", "condition", "wind_kph"],
        properties={"city": {"type": "string", "maxLength": 20}, "temp_c": {"type": "number", "minimum": -50, "maximum": 60},
                    "condition": {"enum": ["sunny", "cloudy", "rain", "snow", "storm"]},
                    "wind_kph": {"type": "integer", "minimum": 0, "maximum": 300}})),
    "event_dates": ("Describe a conference.", _s(
        type="object", required=["title", "start", "end", "timezone"],
        properties={"title": {"type": "string", "maxLength": 40}, "start": {"type": "string", "format": "date"},
                    "end": {"type": "string", "format": "date"},
                    "timezone": {"enum": ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"]}})),
    "server_config": ("Configure a web server.", _s(
        type="object", required=["host", "port", "tls", "workers"],
        properties={"host": {"type": "string", "format": "ipv4"}, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "tls": {"type": "boolean"}, "workers": {"type": "integer", "minimum": 1, "maximum": 64}})),
    "tags": ("Tag a blog post about cooking.", _s(
        type="object", required=["tags"],
        properties={"tags": {"type": "array", "minItems": 1, "maxItems": 5,
                             "items": {"type": "string", "pattern": "^[a-z]{2,12}$"}}})),
    "matrix": ("Give a 2x3 matrix of small integers.", {
        "type": "array", "minItems": 2, "maxItems": 2,
        "items": {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}),
    "uuid_record": ("Create a database record.", _s(
        type="object", required=["id", "created", "active"],
        properties={"id": {"type": "string", "format": "uuid"}, "created": {"type": "string", "format": "date-time"},
                    "active": {"type": "boolean"}})),
    "sentiment": ("Classify the sentiment of: 'I love this phone'.", _s(
        type="object", required=["label", "score"],
        properties={"label": {"enum": ["positive", "negative", "neutral"]},
                    "score": {"type": "number", "minimum": 0, "maximum": 1}})),
    "recipe": ("Write a short pancake recipe.", _s(
        type="object", required=["name", "servings", "ingredients", "steps"],
        properties={"name": {"type": "string", "maxLength": 30}, "servings": {"type": "integer", "minimum": 1, "maximum": 8},
                    "ingredients": {"type": "array", "minItems": 2, "maxItems": 4,
                                    "items": _s(type="object", required=["item", "grams"],
                                                properties={"item": {"type": "string", "maxLength": 20},
                                                            "grams": {"type": "integer", "minimum": 1, "maximum": 1000}})},
                    "steps": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string", "maxLength": 60}}})),
    "tree": ("Describe a small folder tree.", {"$defs": {
        "leaf": _s(type="object", required=["name"], properties={"name": {"type": "string", "pattern": "^[a-z]{1,8}$"}}),
        "dir": _s(type="object", required=["name", "children"],
                  properties={"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                              "children": {"type": "array", "maxItems": 3, "items": {"$ref": "#/$defs/leaf"}}})},
        "type": "object", "additionalProperties": False, "required": ["root"],
        "properties": {"root": _s(type="object", required=["name", "children"],
                                  properties={"name": {"const": "root"},
                                              "children": {"type": "array", "minItems": 1, "maxItems": 2,
                                                           "items": {"$ref": "#/$defs/dir"}}})}}),
    "invoice": ("Write an invoice for two hours of consulting.", _s(
        type="object", required=["number", "currency", "lines", "paid"],
        properties={"number": {"type": "integer", "minimum": 1000, "maximum": 9999},
                    "currency": {"enum": ["EUR", "USD", "GBP"]}, "paid": {"type": "boolean"},
                    "lines": {"type": "array", "minItems": 1, "maxItems": 3,
                              "items": _s(type="object", required=["what", "hours", "rate"],
                                          properties={"what": {"type": "string", "maxLength": 30},
                                                      "hours": {"type": "number", "minimum": 0, "maximum": 24},
                                                      "rate": {"type": "integer", "minimum": 1, "maximum": 500}})}})),
    "user_profile": ("Create a user profile with optional fields.", _s(
        type="object", required=["username", "roles"],
        properties={"username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
                    "roles": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["admin", "editor", "viewer"]}},
                    "nickname": {"type": ["string", "null"], "maxLength": 20},
                    "age": {"type": "integer", "minimum": 13, "maximum": 99}})),
    "anyof_contact": ("Give one way to contact support.", {"anyOf": [
        _s(type="object", required=["email"], properties={"email": {"type": "string", "format": "email", "maxLength": 40}}),
        _s(type="object", required=["phone"], properties={"phone": {"type": "string", "pattern": "^\\+[0-9]{8,12}$"}})]}),
    "color_hex": ("Pick a brand color.", _s(
        type="object", required=["name", "hex"],
        properties={"name": {"type": "string", "maxLength": 15}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    "flight": ("Book a flight.", _s(
        type="object", required=["from", "to", "date", "passengers", "class"],
        properties={"from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "date": {"type": "string", "format": "date"},
                    "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                    "class": {"enum": ["economy", "business", "first"]}})),
    "enum_list": ("Choose three planets.", {
        "type": "array", "minItems": 3, "maxItems": 3,
        "items": {"enum": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]}}),
}


def hand_written() -> list[SchemaCase]:
    return [SchemaCase(name, json.dumps(schema), task, False) for name, (task, schema) in HAND.items()]


def vendored() -> list[SchemaCase]:
    """The schemas check-jsonschema ships (empty if it is not installed)."""
    try:
        import importlib.resources as res

        root = res.files("check_jsonschema") / "builtin_schemas" / "vendor"
        files = sorted((f for f in root.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    except (ModuleNotFoundError, FileNotFoundError):
        return []
    out = []
    for f in files:
        text = f.read_text()
        schema = json.loads(text)
        about = (schema.get("title") or schema.get("description") or f.name[:-5]) if isinstance(schema, dict) else f.name
        out.append(SchemaCase(f.name[:-5], json.dumps(tightest(schema)), f"Write a minimal JSON config for: "
                                                                         f"{str(about)[:160]}", True, text))
    return out


def all_schemas() -> list[SchemaCase]:
    return vendored() + hand_written()
