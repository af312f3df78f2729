"""The teacher: any OpenAI-compatible chat endpoint, asked concurrently, answers cached on disk.

    client.py      `TeacherClient(TeacherConfig(url, model), cache=...)`, `.ask([Prompt])` ->
                   `[Answer]`; `default_cache_path(output)`. THE client every room asks through
    cache.py       `TeacherCache` (sqlite, WAL) and `cache_key`: an answer is written before it is used
    heuristic.py   `answer`: `--teacher=heuristic`, an offline stand-in that answers in the teacher's
                   format from the text itself (tests, demos, machines without a teacher)
"""
