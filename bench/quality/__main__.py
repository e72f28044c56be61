from bench.quality.cli import main

raise SystemExit(main())
