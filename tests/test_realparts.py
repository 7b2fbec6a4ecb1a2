"""The real parts themselves: the PostgreSQL server fixture and Playwright driving Chromium."""

from __future__ import annotations

import os
import pwd

import asyncpg
import pytest

import realparts
from realparts import PartMissing


async def test_asyncpg_connects_and_runs_a_query(postgres_db):
    conn = await asyncpg.connect(postgres_db)
    try:
        assert (await conn.fetchval("SELECT version()")).startswith("PostgreSQL ")
        await conn.execute("CREATE TABLE heads (episode text PRIMARY KEY, seq bigint NOT NULL)")
        await conn.executemany("INSERT INTO heads VALUES ($1, $2)", [("e1", 1), ("e2", 7)])
        assert await conn.fetchval("SELECT sum(seq) FROM heads") == 8
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
    finally:
        await conn.close()


async def test_two_databases_are_isolated(postgres):
    first, second = postgres.create_database("iso_first"), postgres.create_database("iso_second")
    conn = await asyncpg.connect(first)
    try:
        await conn.execute("CREATE TABLE only_here (n int)")
    finally:
        await conn.close()
    conn = await asyncpg.connect(second)
    try:
        assert await conn.fetchval("SELECT to_regclass('only_here')") is None
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        assert await conn.fetchval("SELECT current_database()") == "iso_second"
    finally:
        await conn.close()


async def test_server_runs_as_a_non_root_user(postgres, postgres_db):
    conn = await asyncpg.connect(postgres_db)
    try:  # the backend's process ends with its connection: looked at while it is open
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        for pid in (postgres.server_pid(), backend):
            uid = os.stat(f"/proc/{pid}").st_uid
            assert uid != 0, f"PostgreSQL process {pid} runs as root"
            if os.geteuid() == 0:
                assert pwd.getpwuid(uid).pw_name == "postgres"
    finally:
        await conn.close()


async def test_a_wrong_password_is_refused(postgres):
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.dsn.replace(postgres.password, "not-the-password"))


def test_missing_postgres_names_the_install_command(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(realparts.glob, "glob", lambda pattern: [])
    with pytest.raises(PartMissing) as refused:
        realparts.postgres_bindir()
    assert "make setup" in str(refused.value)
    assert "apt-get install -y postgresql" in str(refused.value)


async def test_playwright_drives_debian_chromium_through_the_gateway(gateway, kubo):
    from playwright.async_api import async_playwright

    marker = os.urandom(8).hex()
    page_html = f"<html><body><p id='m'>{marker}</p></body></html>".encode()
    cid = kubo.ipfs("add", "-Q", "--cid-version=1", input=page_html).stdout.decode().strip()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(realparts.chromium_executable()),
                                          args=["--no-sandbox"])
        try:
            context = await browser.new_context(extra_http_headers=gateway.headers)
            page = await context.new_page()
            response = await page.goto(f"{gateway.url}/ipfs/{cid}")
            assert response.status == 200
            assert await page.text_content("#m") == marker
        finally:
            await browser.close()
