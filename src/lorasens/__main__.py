from lorasens.cli import main

raise SystemExit(main())
