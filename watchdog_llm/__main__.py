from watchdog_llm.cli import main

raise SystemExit(main())
