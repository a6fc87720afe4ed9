import sys

from devcluster.supervisor import main

sys.exit(main())
