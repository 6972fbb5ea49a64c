import sys

from respec_async.zoo.command import main

sys.exit(main())
