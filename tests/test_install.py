"""The package installs and migrates without the checkout: schema.sql is package data."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from conftest import PG_ADMIN

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_non_editable_install_outside_the_checkout_can_migrate(tmp_path: Path) -> None:
    """`pip install .` into a fresh venv, then `gateway db migrate` from another directory
    creates the database and every table of schema.sql."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    schema = installed / "site-packages" / "gateway" / "schema.sql"
    assert schema.is_file() and not schema.is_symlink()
    name = f"gw_install_{uuid.uuid4().hex[:10]}"
    try:
        migrate = subprocess.run(
            [str(venv / "bin" / "gateway"), "db", "migrate", "--database-url",
             f"{PG_ADMIN}/{name}"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert migrate.returncode == 0, migrate.stderr
        assert "created database" in migrate.stdout
        tables = asyncio.run(_tables(f"{PG_ADMIN}/{name}"))
        assert {"devices", "device_settings", "device_settings_history", "commands",
                "api_keys", "device_credentials", "sweeps"} <= tables
    finally:
        asyncio.run(_drop(name))


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


async def _drop(name: str) -> None:
    admin = await asyncpg.connect(f"{PG_ADMIN}/postgres")
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()
